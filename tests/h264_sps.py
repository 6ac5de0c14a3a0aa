"""A minimal H.264 SPS reader (ITU-T H.264 7.3.2.1.1 and E.1.1), enough to read the VUI bitstream restriction."""

class Bits:
    def __init__(self, b):
        # remove emulation prevention
        out=bytearray(); z=0
        for x in b:
            if z>=2 and x==3: z=0; continue
            out.append(x); z = z+1 if x==0 else 0
        self.b=bytes(out); self.i=0
    def u(self,n):
        v=0
        for _ in range(n):
            v=(v<<1)|((self.b[self.i>>3]>>(7-(self.i&7)))&1); self.i+=1
        return v
    def ue(self):
        z=0
        while self.u(1)==0: z+=1
        return (1<<z)-1+self.u(z)
    def se(self):
        k=self.ue(); return (k+1)//2 if k&1 else -(k//2)
def parse_sps(sps: bytes) -> dict:
    """SPS NAL (header byte included) -> profile, max_ref, vui, bitstream_restriction, max_num_reorder_frames, ..."""
    r=Bits(sps[1:]); prof=r.u(8); r.u(8); r.u(8); r.ue()
    if prof in (100,110,122,244,44,83,86,118,128,138,139,134,135):
        cf=r.ue()
        if cf==3: r.u(1)
        r.ue(); r.ue(); r.u(1)
        if r.u(1):
            for i in range(8 if cf!=3 else 12):
                if r.u(1):
                    last=8; nxt=8
                    for j in range(16 if i<6 else 64):
                        if nxt: nxt=(last+r.se()+256)%256
                        last = nxt or last
    r.ue(); poc=r.ue()
    if poc==0: r.ue()
    elif poc==1:
        r.u(1); r.se(); r.se()
        for _ in range(r.ue()): r.se()
    maxref=r.ue(); r.u(1); r.ue(); r.ue(); fmo=r.u(1)
    if not fmo: r.u(1)
    r.u(1)
    if r.u(1): r.ue();r.ue();r.ue();r.ue()
    vui=r.u(1); d={"profile":prof,"max_ref":maxref,"vui":vui}
    if not vui: return d
    if r.u(1):
        if r.u(8)==255: r.u(16); r.u(16)
    if r.u(1): r.u(1)
    if r.u(1):
        r.u(3); r.u(1)
        if r.u(1): r.u(8);r.u(8);r.u(8)
    if r.u(1): r.ue(); r.ue()
    if r.u(1): r.u(32); r.u(32); r.u(1)
    def hrd():
        n=r.ue()+1; r.u(4); r.u(4)
        for _ in range(n): r.ue(); r.ue(); r.u(1)
        r.u(5);r.u(5);r.u(5);r.u(5)
    a=r.u(1)
    if a: hrd()
    b=r.u(1)
    if b: hrd()
    if a or b: r.u(1)
    r.u(1)
    br=r.u(1); d["bitstream_restriction"]=br
    if br:
        r.u(1); r.ue(); r.ue(); r.ue(); r.ue(); d["max_num_reorder_frames"]=r.ue(); d["max_dec_frame_buffering"]=r.ue()
    return d
