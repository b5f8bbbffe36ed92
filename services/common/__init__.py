"""What both services share: settings, problem+json errors, middleware, metrics, health, logs."""
