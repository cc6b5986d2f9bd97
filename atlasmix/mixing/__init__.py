"""atlasmix.mixing — see the open issues for what this stage will hold."""
