"""kubetune cli."""
