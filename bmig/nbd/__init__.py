"""bmig-nbd: an NBD server that reports every change of its exports to breqd.

service.py assembles it from its settings; docs/architecture.md has the map."""
