"""The knowledge view: resolution groups and candidates, articles and their use, deflection.

Documents per tenant (the definitions are in `domain.knowledge`):

- `group` (key `topic|code|normalised summary`): resolutions, handling time, the trailing window,
  when it became a candidate, the articles that cover it;
- `article` (key article id): title, topic, code, published at, views, resolutions it covered,
  self-service sessions that showed it and how many of them were deflected;
- `summary` (key `tenant`): resolutions and covered resolutions, settled sessions, deflected
  ones, per topic, and the article index used to decide coverage;
- `case` (key case id): topic and opening time, for handling time.

One document across tenants (kind `pending`, tenant `_system`) holds the sessions awaiting their
verdict. The watermark that settles them is the highest `occurred_at` folded (clock ticks
included) minus the policy's allowed lateness. Only the interactions log is folded, in log
order, so live and rebuilt views are identical.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from loopservice.domain import knowledge as kn
from loopservice.domain.events import (
    SYSTEM_TENANT,
    ArticlePublished,
    ArticleViewed,
    CaseOpened,
    CaseResolved,
    Event,
    PolicyPublished,
    SelfServiceSession,
)
from loopservice.domain.policy import KnowledgeSection, Policy
from loopservice.domain.signals import Signal
from loopservice.infra.sqlite_log import decode_interaction
from loopservice.projections.context import new_rules
from loopservice.projections.store import Doc, View

KNOWLEDGE_TOPICS: tuple[str, ...] = (
    "case.opened", "case.resolved", "knowledge.article_published", "knowledge.article_viewed",
    "selfservice.session", "clock.tick", "policy.published",
)  # fmt: skip


def _summary(tenant: str) -> Doc:
    return {
        "tenant_id": tenant,
        "resolutions": 0,
        "covered_resolutions": 0,
        "sessions": {"started": 0, "settled": 0, "deflected": 0, "became_case": 0,
                     "self_reported_resolved": 0, "with_articles": 0,
                     "with_articles_deflected": 0},
        "published": 0,
        "topics": {},
        "articles": {},
        "groups_by_topic": {},
    }  # fmt: skip


def _article(tenant: str, article_id: str) -> Doc:
    return {
        "tenant_id": tenant, "article_id": article_id, "title": None, "topic": None,
        "resolution_code": None, "published_at": None, "views": 0, "used_in_resolutions": 0,
        "sessions": 0, "deflected": 0, "became_case": 0,
    }  # fmt: skip


class KnowledgeFold:
    name = "knowledge"
    interaction_topics = KNOWLEDGE_TOPICS
    decode = staticmethod(decode_interaction)

    def __init__(self, default_policy: Policy) -> None:
        self.rules = new_rules(default_policy)

    def remember_policy(self, event: PolicyPublished) -> None:
        self.rules.publish(event)

    def _pending(self, view: View) -> Doc:
        return view.doc("pending", SYSTEM_TENANT, "sessions", SYSTEM_TENANT, "",
                        kn.new_sessions)  # fmt: skip

    @staticmethod
    def _pending_view(view: View) -> Doc | None:
        return view.find("pending", SYSTEM_TENANT, "sessions")

    def _tenant(self, view: View, tenant: str) -> Doc:
        return view.doc("summary", tenant, tenant, "", "", lambda: _summary(tenant))

    def _article_doc(self, view: View, tenant: str, article_id: str) -> Doc:
        return view.doc("article", tenant, article_id, "", "",
                        lambda: _article(tenant, article_id))  # fmt: skip

    def apply_event(self, view: View, position: int, event: Event) -> None:
        policy = self.rules.in_force(event.occurred_at)
        rules = policy.knowledge
        match event:
            case PolicyPublished():
                self.rules.publish(event)
            case CaseOpened():
                self._opened(view, event)
            case CaseResolved():
                self._resolved(view, event, rules)
            case ArticlePublished():
                self._published(view, event)
            case ArticleViewed():
                self._article_doc(view, event.tenant_id, event.article_id)["views"] += 1
            case SelfServiceSession():
                kn.start_session(
                    self._pending(view), event.event_id, event.tenant_id, event.account_id,
                    event.topic, event.occurred_at, event.article_ids, event.resolved, rules,
                )  # fmt: skip
                summary = self._tenant(view, event.tenant_id)
                summary["sessions"]["started"] += 1
        self._advance(view, event.occurred_at - timedelta(seconds=policy.allowed_lateness_seconds))

    def _opened(self, view: View, event: CaseOpened) -> None:
        assert event.case_id is not None
        if view.find("case", event.tenant_id, event.case_id) is not None:
            return
        view.doc("case", event.tenant_id, event.case_id, event.account_id, "",
                 lambda: {"topic": event.topic, "opened_at": event.occurred_at.isoformat(),
                          "groups": []})  # fmt: skip
        pending = self._pending_view(view)
        if pending is None or not pending["open"]:
            return
        became = kn.case_opened(
            pending, event.tenant_id, event.account_id, event.topic, event.occurred_at
        )
        if became:
            self._pending(view)  # mark changed
            for session in became:
                self._settle(view, session, deflected=False)

    def _resolved(self, view: View, event: CaseResolved, rules: KnowledgeSection) -> None:
        assert event.case_id is not None
        tenant = event.tenant_id
        case = view.find("case", tenant, event.case_id)
        if case is None:
            return  # a case never opened stays out of the view
        topic, code = case["topic"], event.resolution_code
        summary_text = kn.normalise_summary(event.summary)
        key = kn.group_key(topic, code, summary_text)
        if key in case["groups"]:
            return  # one resolution per case and group
        case = view.doc("case", tenant, event.case_id, event.account_id, "", dict)
        case["groups"].append(key)
        handling = (event.occurred_at - datetime.fromisoformat(case["opened_at"])).total_seconds()
        summary = self._tenant(view, tenant)
        index = summary["articles"]
        group = view.find("group", tenant, key)
        if group is None:
            summary["groups_by_topic"].setdefault(topic, []).append(key)
        group = view.doc("group", tenant, key, "", topic,
                         lambda: kn.new_group(topic, code, summary_text))  # fmt: skip
        if group["resolutions"] == 0:
            group["covered_by"] = [a[2] for a in index.get(topic, ()) if a[1] in (None, code)]
        kn.add_resolution(group, event.occurred_at, max(handling, 0.0), rules)
        summary["resolutions"] += 1
        covering = kn.covering_article(index, topic, code, event.occurred_at)
        if covering is not None:
            summary["covered_resolutions"] += 1
            group["covered_resolutions"] += 1
            self._article_doc(view, tenant, covering)["used_in_resolutions"] += 1

    def _published(self, view: View, event: ArticlePublished) -> None:
        tenant = event.tenant_id
        article = self._article_doc(view, tenant, event.article_id)
        first = article["published_at"] is None
        article.update(title=event.title, topic=event.topic,
                       resolution_code=event.resolution_code,
                       published_at=event.occurred_at.isoformat())  # fmt: skip
        summary = self._tenant(view, tenant)
        kn.index_article(summary["articles"], event.topic, event.resolution_code,
                         event.occurred_at, event.article_id)  # fmt: skip
        summary["published"] += int(first)
        for key in summary["groups_by_topic"].get(event.topic, ()):
            group = view.doc("group", tenant, key, "", event.topic, dict)
            covered = kn.covers(event.topic, event.resolution_code, group["topic"],
                                group["resolution_code"])  # fmt: skip
            if covered and event.article_id not in group["covered_by"]:
                group["covered_by"].append(event.article_id)

    def _advance(self, view: View, watermark: datetime) -> None:
        pending = self._pending_view(view)
        if pending is not None and pending["watermark"] >= watermark.isoformat():
            return
        pending = self._pending(view)
        pending["watermark"] = watermark.isoformat()
        if pending["queue"] and pending["queue"][0][0] <= pending["watermark"]:
            for session in kn.settle(pending, watermark):
                self._settle(view, session, deflected=True)

    def _settle(self, view: View, session: Doc, *, deflected: bool) -> None:
        tenant = session["tenant"]
        summary = self._tenant(view, tenant)
        counts = summary["sessions"]
        counts["settled"] += 1
        counts["deflected" if deflected else "became_case"] += 1
        counts["self_reported_resolved"] += int(session["resolved"])
        if session["articles"]:
            counts["with_articles"] += 1
            counts["with_articles_deflected"] += int(deflected)
        topic = summary["topics"].setdefault(session["topic"], {"settled": 0, "deflected": 0})
        topic["settled"] += 1
        topic["deflected"] += int(deflected)
        for article_id in dict.fromkeys(session["articles"]):
            article = self._article_doc(view, tenant, article_id)
            article["sessions"] += 1
            article["deflected" if deflected else "became_case"] += 1

    def apply_signal(self, view: View, position: int, signal: Signal) -> None:
        return None
