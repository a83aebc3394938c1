from loopservice.cli import main

main()
