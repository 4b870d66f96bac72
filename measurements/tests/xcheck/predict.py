#!/usr/bin/env python3
"""Independent (stdlib-only) recomputation of the input-dependent boot-event digests the Rust predictor
produces for our VMM's OVMF direct boot (measurements/src/predict): the loader-patched kernel's Authenticode
SHA-384, the TD HOB digest and the CFV digest. Usage: predict.py OVMF KERNEL INITRD_LEN MEMORY_BYTES
Prints three lines: kernel=<hex> td_hob=<hex> cfv=<hex>. Written from the specs (PE/COFF Authenticode,
Linux boot protocol, PI HOBs, TDVF metadata), not from the Rust code."""
import hashlib, struct, sys, uuid

def u16(b, o): return struct.unpack_from("<H", b, o)[0]
def u32(b, o): return struct.unpack_from("<I", b, o)[0]

def patch(k, initrd_len, mem):
    k = bytearray(k)
    proto = u16(k, 0x206)
    k[0x210] = 0xB0
    k[0x211] |= 0x80
    struct.pack_into("<I", k, 0x224, 0x20000 - 0x10000 - 0x200)
    struct.pack_into("<I", k, 0x228, 0x20000)
    if initrd_len:
        if proto >= 0x20C and u16(k, 0x236) & 0x40:
            top = 0xFFFFFFFF
        elif proto >= 0x203 and u32(k, 0x22C):
            top = u32(k, 0x22C)
        else:
            top = 0x37FFFFFF
        low = min(mem, 0xC0000000) - 0x28000
        top = min(top, low - 1)
        struct.pack_into("<I", k, 0x218, (top - initrd_len) & ~0xFFF)
        struct.pack_into("<I", k, 0x21C, initrd_len)
    return bytes(k)

def authenticode(img):
    pe = u32(img, 0x3C)
    opt = pe + 24
    magic = u16(img, opt)
    dirs = opt + (112 if magic == 0x20B else 96)
    cksum, cert_dir = opt + 64, dirs + 4 * 8
    hdr_size = u32(img, opt + 60)
    h = hashlib.sha384()
    h.update(img[:cksum]); h.update(img[cksum + 4:cert_dir]); h.update(img[cert_dir + 8:hdr_size])
    nsec, sec_tab = u16(img, pe + 6), opt + u16(img, pe + 20)
    secs = sorted((u32(img, s + 20), u32(img, s + 16)) for s in (sec_tab + 40 * i for i in range(nsec)))
    done = hdr_size
    for ptr, size in secs:
        if size:
            h.update(img[ptr:ptr + size]); done += size
    cert_size = u32(img, cert_dir + 4)
    extra = len(img) - done - (cert_size if u32(img, cert_dir) else 0)
    if extra > 0:
        h.update(img[done:done + extra])
    return h.hexdigest()

def tdvf_sections(fw):
    # OVMF footer table: GUID 96b582de-... at len-48, u16 total length before it; walk entries backwards.
    footer = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
    tdx = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
    end = len(fw) - 32
    assert fw[end - 16:end] == footer
    total = u16(fw, end - 18)
    pos, start = end - 18, end - total
    desc = None
    while pos - start >= 18:
        guid, ln = fw[pos - 16:pos], u16(fw, pos - 18)
        if guid == tdx:
            desc = len(fw) - u32(fw, pos - 22)
            break
        pos -= ln
    assert desc is not None and fw[desc:desc + 4] == b"TDVF"
    n = u32(fw, desc + 12)
    return [struct.unpack_from("<IIQQII", fw, desc + 16 + 32 * i) for i in range(n)]

def td_hob(secs, mem):
    # (start, end) of RAM: below the 3 GiB MMIO hole, the rest from 4 GiB.
    ram = [(0, mem)] if mem <= 0xC0000000 else [(0, 0xC0000000), (1 << 32, (1 << 32) + mem - 0xC0000000)]
    acc = sorted((s[2], s[2] + s[3]) for s in secs if s[4] in (2, 3))
    runs = []
    for a, e in ram:
        points = sorted({a, e} | {min(max(x, a), e) for r in acc for x in r})
        for lo, hi in zip(points, points[1:]):
            t = 0 if any(s <= lo and hi <= f for s, f in acc) else 7
            if runs and runs[-1][1] == lo and runs[-1][2] == t:
                runs[-1][1] = hi
            else:
                runs.append([lo, hi, t])
    base = next(s[2] for s in secs if s[4] == 2)
    res = b"".join(struct.pack("<HHI16sIIQQ", 3, 48, 0, bytes(16), t, 7, lo, hi - lo) for lo, hi, t in runs)
    phit_len = 56
    phit = struct.pack("<HHIII", 1, 56, 0, 9, 0) + bytes(32) + struct.pack("<Q", base + phit_len + len(res) + 8)
    return hashlib.sha384(phit + res).hexdigest()

def main():
    fw = open(sys.argv[1], "rb").read()
    kernel = open(sys.argv[2], "rb").read()
    initrd_len, mem = int(sys.argv[3]), int(sys.argv[4])
    secs = tdvf_sections(fw)
    cfv = next(s for s in secs if s[4] == 1)
    print("kernel=" + authenticode(patch(kernel, initrd_len, mem)))
    print("td_hob=" + td_hob(secs, mem))
    print("cfv=" + hashlib.sha384(fw[cfv[0]:cfv[0] + cfv[1]]).hexdigest())

main()
