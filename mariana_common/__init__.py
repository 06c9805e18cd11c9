"""What every Mariana service needs and nothing domain-specific: settings,
logging, TLS, server bootstrap, health and the error-to-status map."""
