"""The device-mapper intercept: dm-era tracks writes in the kernel, bmig imports them.

See docs/dm-intercept.md for the stack it builds and the argument that nothing written
is ever missing from breqd.
"""
