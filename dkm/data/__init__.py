"""The data stage: named datasets (``catalog``), the file formats they ship in (``readers``),
checked downloads (``download``), and how every dkm Zarr store is marked, written atomically
and recognised again (``store``)."""
