"""kubetune local."""
