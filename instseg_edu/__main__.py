from instseg_edu.cli import main

raise SystemExit(main())
