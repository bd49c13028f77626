"""What the tests share: personas and factories, scenes, fixtures and harnesses."""
