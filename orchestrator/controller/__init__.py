"""kubetune controller."""
