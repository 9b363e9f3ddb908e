"""Small shared plumbing for the stage scripts: flags, artifacts, distributed runs."""
