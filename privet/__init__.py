"""The `privet` command: the front door above both sides (a site's commands from client/, the coordinator's from
server/), so that neither side imports the other."""
