"""Shipping a policy: the registry and the pyfunc model it stores, serving, deployment targets, the
checks of what is served, batch inference and promotion (register, deploy, inference)."""
