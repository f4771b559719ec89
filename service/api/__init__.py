"""The HTTP layer: module-level routers over one `AppState`; `service.app` assembles them."""
