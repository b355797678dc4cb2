from xpnet.cli import main

raise SystemExit(main())
