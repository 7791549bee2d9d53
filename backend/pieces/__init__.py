"""Pieces: the ``layerpass`` torch.compile backend proper. One Dynamo graph is split into pieces
(``split.py``), each piece gets a structural hash (``piece_hash.py``) so identical pieces
compile once (``compiler.py``: one get-or-compile path; ``debug_compile.py``: the ``aot_eager`` /
``eager`` compilers), the passes a config turns on run on
each (``pass_list.py``), and the result is a serialisable program calling the compiled
pieces (``program.py``); Inductor's CPU ISA probe is started early and its answer saved
(``isa_probe.py``, ``isa_answer.py``).
"""
