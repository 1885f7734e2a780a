"""The red team: the options (config.py), attack families (families/: one registry), what is scored (attacks.py),
judges (judges.py), the team that runs them (team.py), its records (record.py, report.py) and `erasure attack` end to
end (attack.py)."""
