#!/usr/bin/env python3
"""Independent MRTD calculator (stdlib only) used to cross-check the Rust implementation.

Usage: mrtd.py FIRMWARE  -> prints "<single-pass hex> <two-pass hex>".
Written separately from src/mrtd.rs from the algorithm description in tdx-facts §2.
"""
import hashlib, struct, sys, uuid

def guid(s):
    return uuid.UUID(s).bytes_le

def find_descriptor(fw):
    n = len(fw)
    if fw[n-48:n-32] == guid("96b582de-1fb2-45f7-baea-a366c55a082d"):
        tlen = struct.unpack_from("<H", fw, n-50)[0]
        start, end = n - 32 - tlen, n - 50
        while end - start >= 18:
            elen = struct.unpack_from("<H", fw, end-18)[0]
            if fw[end-16:end] == guid("e47a6535-984a-4798-865e-4685a7bf8ec2"):
                return n - struct.unpack_from("<I", fw, end-22)[0]
            end -= elen
    off = struct.unpack_from("<I", fw, n-0x20)[0]
    pos = n - off
    if fw[pos:pos+4] == b"TDVF":
        return pos
    return pos + 16

def mrtd(fw, two_pass):
    pos = find_descriptor(fw)
    sig, length, ver, count = struct.unpack_from("<4sIII", fw, pos)
    assert sig == b"TDVF" and ver == 1
    h = hashlib.sha384()
    def rec(tag, gpa):
        b = bytearray(128); b[:len(tag)] = tag; b[16:24] = struct.pack("<Q", gpa); return bytes(b)
    for i in range(count):
        doff, rsize, gpa, msize, typ, attr = struct.unpack_from("<IIQQII", fw, pos+16+32*i)
        data = fw[doff:doff+rsize] + bytes(msize - rsize)
        adds = [rec(b"MEM.PAGE.ADD", gpa + p*4096) for p in range(msize//4096)] if not attr & 2 else []
        exts = []
        if attr & 1:
            for p in range(msize//4096):
                exts.append(b"".join(rec(b"MR.EXTEND", gpa+p*4096+c*256) + data[p*4096+c*256:p*4096+c*256+256] for c in range(16)))
        if two_pass:
            for a in adds: h.update(a)
            for e in exts: h.update(e)
        else:
            for p in range(msize//4096):
                if adds: h.update(adds[p])
                if exts: h.update(exts[p])
    return h.hexdigest()

fw = open(sys.argv[1], "rb").read()
print(mrtd(fw, False), mrtd(fw, True))
