"""The pure core: no I/O, no trio, no sockets, no files. Bytes and dicts in, values out."""
