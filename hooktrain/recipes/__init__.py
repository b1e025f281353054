"""Built-in recipes: each module assigns ``recipe``."""
