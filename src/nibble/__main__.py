from nibble.cli.main import main

raise SystemExit(main())
