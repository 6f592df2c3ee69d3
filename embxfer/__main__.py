from embxfer.runtime.cli import main

raise SystemExit(main())
