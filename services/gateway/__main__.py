from services.gateway.server import main

raise SystemExit(main())
