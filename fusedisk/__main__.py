from fusedisk.cli import main

raise SystemExit(main())
