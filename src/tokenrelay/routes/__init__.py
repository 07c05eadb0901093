"""HTTP routes: validate, call the hub or the store, respond. Behaviour lives elsewhere."""
