from usersyncd.cli import main

raise SystemExit(main())
