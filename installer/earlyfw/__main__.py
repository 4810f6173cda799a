from earlyfw.cli import main

main()
