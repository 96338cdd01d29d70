from kmm.cli import main

raise SystemExit(main())
