"""`python -m psyface.report` runs the report stage."""

from psyface.report.stage import main

main()
