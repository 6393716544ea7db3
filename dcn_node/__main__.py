from dcn_node.cli import main

raise SystemExit(main())
