from glotkit.cli import main

raise SystemExit(main())
