"""The waiting room: which requests that hold a thread long (conversions, upload bodies) get one now, and in what
order the others get theirs, client by client, without holding a thread while they wait. Used by front.py; it
knows nothing of sockets."""

import collections
import threading
import time


class WaitingRoom:
    """Requests that hold a thread long (`needs_turn(head)` names their kind: conversions for thumbnails and IIIF,
    bodies for uploads) hold at most `total` threads together and each kind at most its `budget`, one client at
    most half of each; the others wait here, holding no thread, each for at most `wait` seconds. A freed thread
    goes to the next client in turn below its fair share, so a museum's burst waits its turn instead of being
    refused, a client's flood leaves the other half of the threads to everyone else, and every other request
    (/health, cached files) still finds threads."""

    def __init__(self, needs_turn, budget, wait, clock=time.monotonic, total=None):
        self.needs_turn, self.wait, self.clock = needs_turn, wait, clock
        self.budgets = budget if isinstance(budget, dict) else collections.defaultdict(lambda: budget)
        self.total = total or (max(budget.values()) if isinstance(budget, dict) else budget)
        self.running = collections.Counter()         # (client, kind) -> its requests let in and not yet over
        self.waiting = collections.OrderedDict()     # client -> its waiting connections, oldest first
        self.lock = threading.Lock()

    def enter(self, connection):
        """True when the request may take a thread now; else it waits in its client's line. (While a thread is
        free for its kind, every client waiting for that kind is at its most: nobody is passed over.)"""
        with self.lock:
            if self.fits(connection, self.most(kind_of(connection))):
                self.running[connection.client, kind_of(connection)] += 1
                return True
            connection.waits_until = self.clock() + self.wait
            self.waiting.setdefault(connection.client, collections.deque()).append(connection)
            return False

    def most(self, kind, clients=1):
        """What one client may hold of a kind's threads: half, or its fair share among `clients`."""
        return -(-self.budgets[kind] // max(2, clients))

    def fits(self, connection, most):
        """Whether a thread is free for the connection's kind, and its client holds fewer than `most` of them."""
        kind = kind_of(connection)
        of_kind = sum(count for (_client, held), count in self.running.items() if held == kind)
        return (sum(self.running.values()) < self.total and of_kind < self.budgets[kind]
                and self.running[connection.client, kind] < most)

    def leave(self, client, kind=True):
        """A request of `client` (of `kind`) let in is over: the waiting ones to let in now (a thread freed for one
        kind may free the total for another)."""
        with self.lock:
            self.running[client, kind] -= 1
            if self.running[client, kind] <= 0:
                del self.running[client, kind]
            let_in = []
            while (chosen := self.next_waiting()) is not None:
                client, connection = chosen
                line = self.waiting.pop(client)
                line.remove(connection)
                if line:
                    self.waiting[client] = line            # to the end of the turn
                self.running[client, kind_of(connection)] += 1
                let_in.append(connection)
            return let_in

    def next_waiting(self):
        """(client, connection): the first waiting client in turn below its fair share of its request's kind, else
        below its most, and its oldest request a thread is free for; None for none."""
        present = len(self.waiting.keys() | {client for client, _kind in self.running})
        for fair in (True, False):
            for client, line in self.waiting.items():
                for connection in line:
                    kind = kind_of(connection)
                    if self.fits(connection, self.most(kind, present) if fair else self.most(kind)):
                        return client, connection
        return None

    def expired(self, now):
        """Take out every request that has waited its `wait`."""
        gone = []
        with self.lock:
            for client in list(self.waiting):
                line = self.waiting[client]
                while line and line[0].waits_until <= now:
                    gone.append(line.popleft())
                if not line:
                    del self.waiting[client]
        return gone

    def next_deadline(self):
        """When the soonest waiting request is given up (None: none waits)."""
        with self.lock:
            return min((line[0].waits_until for line in self.waiting.values()), default=None)


def kind_of(connection):
    """What a connection waits for (what needs_turn named; True when no kind was named)."""
    return getattr(connection, 'kind', True)
