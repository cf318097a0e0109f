"""Errors of the ipc package.

IpcError
├── InvalidName          a namespace or semaphore name POSIX would refuse
├── NamespaceBusy        another launcher holds the namespace
├── NamespaceMissing     no launcher has set the namespace up
├── LedgerFull           a worker holds permits on more semaphores than its ledger has slots
├── GatesUnavailable     the shared gates' store (Redis) does not answer, or is recovering
└── CredentialGone       a credential's gate was removed (its user was deleted)
"""


class IpcError(Exception):
    pass


class InvalidName(IpcError):
    pass


class NamespaceBusy(IpcError):
    pass


class NamespaceMissing(IpcError):
    pass


class LedgerFull(IpcError):
    pass


class GatesUnavailable(IpcError):
    pass


class CredentialGone(IpcError):
    pass
