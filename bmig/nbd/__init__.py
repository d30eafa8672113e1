"""bmig-nbd: an NBD server that reports every change of its exports to breqd."""
