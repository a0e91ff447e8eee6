"""Integrations with serving stacks (optional extras): ``kvcal.integrations.lmcache`` needs ``kvcal[lmcache]``."""
