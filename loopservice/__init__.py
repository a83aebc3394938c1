"""Loop Service: customer service as an event-sourced loop."""
