"""atlasmix.training — see the open issues for what this stage will hold."""
