from scaleq.cli import main

main()
