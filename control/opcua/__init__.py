"""OPC UA plant I/O: the plant twin server, its node map and its security.

The twin (:mod:`.twin`) serves the plant model over OPC UA in accelerated time, so the
supervisor writes to a simulated plant exactly as it would to a real one; the node map
(:mod:`.nodemap`) is the one file that says where each machine variable lives; the security
module (:mod:`.security`) owns certificates, the supervisor identity and who may write.
"""
