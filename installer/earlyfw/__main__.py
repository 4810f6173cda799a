from earlyfw.entry import main

main()
