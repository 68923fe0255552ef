"""Providers: where a fleet's replicas come from. The controller decides how many; a provider
launches and terminates them and says what it has (``base.Provider``). ``local``: processes on
this machine through the supervisor."""
