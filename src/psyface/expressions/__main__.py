from psyface.expressions.stage import main

main()
