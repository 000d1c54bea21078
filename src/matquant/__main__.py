from matquant.cli import main

raise SystemExit(main())
