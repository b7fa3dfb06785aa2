"""Code that runs INSIDE sandboxes, copied in by the daemon: never imported by the host.

* ``kernel_server.py``: the code interpreter (E2B's port 49999) in front of Jupyter kernels;
  stdlib + ``jupyter_client`` only (what ``code-interpreter-v1`` installs). The daemon writes its
  source into the sandbox each time it starts it (``server/e2b/interpreter.py``), so the server
  always matches the daemon. Being sandbox code, whatever it answers is hostile input to the host.
* ``languages.py``, ``node_context.py`` + ``js_kernel.js``, ``python_startup.py``: uploaded beside it
  (``interpreter.SERVER_FILES``): which languages the template runs, JavaScript/TypeScript contexts on
  node, and the ``e2b/data``/``e2b/chart`` formats every Python kernel registers at start.

(The agent, PID 1 of every sandbox, is ``shoal.agent``: it is bind-mounted, not copied.)
"""
