#!/usr/bin/env python3
"""Writes modules.dep and modules.alias for a module tree (like depmod, subset), from .modinfo."""
import os, struct, sys

def modinfo(path):
    data = open(path, 'rb').read()
    assert data[:4] == b'\x7fELF' and data[4] == 2
    shoff, = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3a)
    secs = []
    for i in range(shnum):
        name, typ, flags, addr, off, size = struct.unpack_from('<IIQQQQ', data, shoff + i * shentsize)
        secs.append((name, off, size))
    strtab = secs[shstrndx]
    def secname(n):
        s = data[strtab[1] + n:]
        return s[:s.index(b'\0')].decode()
    for name, off, size in secs:
        if secname(name) == '.modinfo':
            fields = [f.decode(errors='replace') for f in data[off:off + size].split(b'\0') if f]
            return fields
    return []

def main(root):
    mods = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith('.ko'):
                full = os.path.join(dirpath, f)
                rel = os.path.relpath(full, root)
                name = f[:-3].replace('-', '_')
                mods[name] = (rel, modinfo(full))
    deps = {}
    aliases = []
    for name, (rel, info) in mods.items():
        d = []
        for field in info:
            k, _, v = field.partition('=')
            if k == 'depends' and v:
                d = [x.replace('-', '_') for x in v.split(',')]
            if k == 'alias':
                aliases.append((v, name))
        deps[name] = [x for x in d if x in mods]
    def closure(name, out, seen):
        for d in deps[name]:
            if d not in seen:
                seen.add(d); out.append(d); closure(d, out, seen)
    with open(os.path.join(root, 'modules.dep'), 'w') as f:
        for name in sorted(mods):
            out = []; closure(name, out, {name})
            f.write(mods[name][0] + ':' + ''.join(' ' + mods[d][0] for d in out) + '\n')
    with open(os.path.join(root, 'modules.alias'), 'w') as f:
        f.write('# Aliases extracted from modules themselves.\n')
        for pattern, name in sorted(aliases):
            f.write(f'alias {pattern} {name}\n')

main(sys.argv[1])
