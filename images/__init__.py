"""Building the mesh's container images: ``make images`` runs ``python3 -m images``.

Not part of the installed package and never imported by a node. By idea:

- ``engine``: docker or podman, and the flags this machine kind needs (runc, ulimits, chroot);
- ``base``: base images from Debian packages (mmdebstrap + import) when no registry answers;
- ``build``: the five images from the Dockerfile, each labelled with the digest of its sources
  so an unchanged image is reused instead of rebuilt;
- ``cli``: the command line.

Needs only Python 3.11's standard library and meshctl (the demo mesh file names the services).
"""
