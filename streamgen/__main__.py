from streamgen.cli import main

raise SystemExit(main())
