"""Operations over many boxes or the whole host: warm pool, fan-out and pick, gc, doctor, admission."""
