from adaptflow.cli import main

main()
