from rwkvforge.cli import main

raise SystemExit(main())
