"""make demo: a live device copied to another "host" while it is written, on one machine.

What it shows is the main job of bmig, with the real daemons and commands: an ext4 image
full of real files is served through bmig-nbd (every write marked in breqd first) while a
writer keeps changing a file inside it; ``bmigrate sync`` ships it to breceive on
127.0.0.1 until the copy has converged under those writes; once the writer stops, a last
``bmigrate sync --threshold 0`` leaves a target that is the source byte for byte (sha256)
and a clean file system (``e2fsck -fn``).

Everything lives in one temporary directory (kept with --keep): the images, the daemons'
state, sockets and logs. Run it with ``make demo`` or ``.venv/bin/python -m bmig.demo``.

The rooms, in the order the story needs them:

- ``settings``: the demo's names, sizes and timeouts, its command line, ``DemoError``;
- ``output``: the lines it prints (steps, details, commands);
- ``image``: the source image: an ext4 file system of real files (or mixed data without
  mkfs), the writer's file in it, and the checks of the copy (sha256, ``e2fsck -fn``);
- ``workload``: the writer, the application whose device is moved;
- ``sync``: ``bmigrate sync`` run on the terminal or with ``--json``, and what it reported;
- ``story``: the steps, the daemons they start and the cleanup, whatever happens.

The demo is a user of bmig like any other: it runs the installed commands and talks to
them only through their command lines, sockets and the NBD export; it never imports the
daemons' internals, and nothing in bmig imports the demo. Its processes are started and
stopped by bmig/processes.py.
"""
